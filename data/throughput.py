"""Images per second of the training data pipeline alone (no model).

python -m data.throughput [--device cpu] [--batch-size 64] [--images 50000] [--epochs 3]
                          [--threads N]
"""

import argparse
import time

import torch

from data.datasets import load_dataset
from data.loader import TensorLoader


def measure_throughput(device="cpu", batch_size=64, images=50000, epochs=3):
    """Images/s of TensorLoader with shuffling and augmentation on, over fake CIFAR-size data.

    One untimed warm-up epoch, then `epochs` timed epochs (synchronising CUDA at the end)."""
    dataset = load_dataset("fake", None, fake_size=(images, 1))
    loader = TensorLoader(dataset.train_images, dataset.train_labels, batch_size, dataset.mean,
                          dataset.std, device, shuffle=True, augment=True, flip=True,
                          generator=torch.Generator().manual_seed(0))
    device = torch.device(device)

    def run_epoch():
        count = sum(len(targets) for _, targets in loader)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return count

    run_epoch()
    start = time.perf_counter()
    count = sum(run_epoch() for _ in range(epochs))
    return count / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--images", type=int, default=50000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="CPU threads for torch (default: torch's default)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rate = measure_throughput(args.device, args.batch_size, args.images, args.epochs)
    print(f"{rate:,.0f} images/s: training pipeline (shuffle, pad-crop, flip, normalise), "
          f"batch {args.batch_size}, {args.images} fake 3x32x32 images, device {args.device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
