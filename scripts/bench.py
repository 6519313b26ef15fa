"""calmwild performance benchmarks: every figure next to its peer or naive counterpart, measured in the same run.

Run on a GPU (DDPM++ CIFAR-10 sizes; sized for under 10 minutes of one H100, not yet measured on one):

    python scripts/bench.py --config cifar --out bench.json [--edm-repo PATH]

and on a CPU (tiny sizes, a few minutes on 2 idle cores):

    python scripts/bench.py --quick --out bench_quick.json

Options: ``--device`` (default cuda if available, else cpu), ``--only NAME ...`` (from the list below),
``--threads N``, ``--variants`` (training), ``--memory-fraction``, ``--edm-repo`` (a checkout of NVlabs/edm), and size
overrides (``--batch-size``, ``--timed-steps``, ``--num-references``, ... see ``--help``). Progress goes to stderr;
stdout gets ONE JSON object (also written to ``--out``) with the device name, library versions, precision settings,
sizes and:

1. training: images/s of ``DiffusionModule`` through ``Trainer.fit`` vs a plain PyTorch loop over the same module
   hooks + Adam + EMA update (Lightning's overhead). On CUDA the variants fp32, tf32, bf16-mixed, + channels_last,
   + compile. Also the datamodule's batches gathered on the device vs per-item collation.
2. network: forward + backward of calmwild's UNet(variant="edm") vs NVlabs/edm's own SongUNet (``--edm-repo``).
3. sampling: samples/s of ``generate`` (Heun, 18 steps), float64-state default vs faster settings, and k-diffusion's
   ``sample_heun`` on the same denoiser and noise (when installed), with the max |difference| of the samples.
4. knn: ``calmwild.neighbors.knn`` vs faiss ``IndexFlatL2`` (when installed) and ``torch.cdist`` + ``topk``, with
   exactness on near-copies (relative d1 error, ratio-test flips).
5. empirical: ``EmpiricalDenoiser`` vs a dense softmax.
6. geometry: the Figure 3 curves vs plain batched loops over the levels in float64 and float32.
7. precision: what bf16 costs in per-sigma MSE (eq. 5), training and evaluation.
8. kid: ``calmwild.fid.kernel_distance`` vs torchmetrics' per-subset ``poly_mmd``.
9. budget: per shipped config, what one evaluation round and the whole run's evaluations cost against training.

The peers (faiss-cpu, k-diffusion, NVlabs/edm) are optional: each is skipped with a note when it is not installed or
given, and none is a calmwild dependency. Timing: synchronised wall clock, warm-up excluded, median of the repeats,
calmwild and its peers interleaved.

Reference figures (issue "Performance"; stored under "reference" in the JSON, with ratios under "vs_reference" for a
CUDA run of --config cifar). EDM's own code on one H100, DDPM++ CIFAR-10 (55.7M parameters):

    training, batch 128:        334 img/s fp32,   843 img/s TF32,   1,036 img/s fp16
    Heun-18 sampling, batch 512: 15 img/s fp32,    62 img/s TF32,      86 img/s fp16

Targets: >= 2,500 img/s training through calmwild's fit; >= 250 samples/s sampling; kNN and the empirical denoiser
at >= half of the fp32 / TF32 matmul peak; the geometry of Figure 3 at 50k training images in < 10 s.
"""

from bench.cli import main

if __name__ == "__main__":
    main()
