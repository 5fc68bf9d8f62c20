"""Training: the run folder, checkpoints, logs and the loop behind demo.py.

    errors.py      UsageError: bad input or an unusable run, reported in one line
    devices.py     where a process runs (CPU, GPUs, torchrun ranks), autocast, wrappers;
                   on a CPU, glibc keeps freed memory
    files.py       atomic writes and checked reads
    lock.py        one writer per run folder
    run_folder.py  config.json, results.csv, model_best.pt, summary.json in --save
    checkpoint.py  complete checkpoints (model, optimizer, ..., RNG, position in the epoch)
    stop.py        SIGTERM/SIGINT/SIGUSR1: stop after the current step
    log.py         what is printed, also written to log.txt; progress without a terminal
    build.py       the model, the data loaders and the optimizer a configuration describes
    loop.py        training epochs, evaluation, the whole run
    plan.py        --plan: what each memory mode needs and what fits (models/memory.py)
    predict.py     --predict: classify image files with a saved run, write predictions.csv
"""
