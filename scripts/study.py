"""The end-to-end study of memorization in the wild middle (issue 11): ``python scripts/study.py --help``.

    python scripts/study.py --quick --out DIR     # about 10 minutes on 2 CPU cores (embedded digits)
    python scripts/study.py --out DIR             # standard: under an hour on 2 CPU cores
    python scripts/study.py --dataset cifar10 --data-root PATH --out DIR   # the paper's setup (GPU)

The study lives in the package scripts/study/ (see study.main for the stages and the output layout).
"""

from study.main import main

if __name__ == "__main__":
    main()
