"""calmwild performance benchmarks: every figure next to its naive / reference counterpart, measured in the same run.

Run on a GPU (DDPM++ CIFAR-10 sizes, about 10-15 minutes on one H100, most of it fp32 sampling and compilation):

    python scripts/bench.py --config cifar --out bench.json

and on a CPU (tiny sizes, about 1.5 minutes on 2 idle cores):

    python scripts/bench.py --quick --out bench_quick.json

Options: ``--device`` (default cuda if available, else cpu),
``--only training,sampling,knn,empirical,geometry,precision,kid``,
``--threads N``, ``--variants`` (training), ``--memory-fraction``, and size overrides (``--batch-size``,
``--timed-steps``, ``--num-references``, ... see ``--help``). Progress goes to stderr; stdout gets ONE JSON object
(also written to ``--out``) with the device name, torch / Lightning / CUDA versions, precision settings, sizes and:

1. training: images/s of ``DiffusionModule`` (UNet, LogNormal sigma, EMA) through ``Trainer.fit`` vs a plain PyTorch
   loop over the same module hooks + Adam + EMA update (Lightning overhead; target < 5 %). On CUDA the variants fp32,
   tf32, bf16-mixed, + channels_last, + compile. Also the datamodule's per-item collation vs batched indexing.
2. sampling: samples/s of ``generate`` (Heun, 18 steps, ``NetworkDenoiser(EDMPrecond(UNet))``), float64-state
   default vs float32 state (on CUDA also TF32 and bf16 autocast), with the max |difference| of the samples.
3. knn: ``calmwild.neighbors.knn`` vs ``torch.cdist`` + ``topk``; TFLOP/s (2 Q N d), errors against float64, and a
   plain ``torch.mm`` of the same shape as the attainable matmul rate.
4. empirical: ``EmpiricalDenoiser`` vs a dense softmax over the full distance matrix; TFLOP/s (4 Q N d per sigma).
5. geometry: ``posterior_weight_curves`` + ``shell_coverage`` over 40 sigmas vs a Python loop of per-sigma brute force.
6. precision: what bf16 costs in per-sigma MSE (eq. 5): two models trained on the embedded digits in fp32 and
   bf16-mixed, each evaluated in fp32 and under bf16 autocast on the same held-out images and noises; the relative
   MSE change per sigma (paired) beside the reference's standard error, and the bf16 / fp32 speed ratios.
7. kid: ``calmwild.fid.kernel_distance`` (kernels once, subsets by indicator products) vs torchmetrics' per-subset
   ``poly_mmd`` (the computation of its KernelInceptionDistance) on the same features and subsets.

Timing: CUDA-synchronised wall clock, warm-up excluded, median of the repeats, calmwild and naive interleaved.

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
