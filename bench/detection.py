"""Detection benchmark (same as ``gate eval``): see gate/encoder/benchmark.py for the protocol.

    .venv/bin/python bench/detection.py --data ../shared/data/msd_hippocampus/imagesTr \
        --encoder contrastive=runs/bench_models/contrastive --encoder ssim=runs/bench_models/ssim \
        --out runs/detection --threads 1
"""

from gate.cli.encoder import eval_command

if __name__ == "__main__":
    eval_command.main(prog_name="bench/detection.py")
