# Stage 4: train the U-Net (CUDA when present, CPU otherwise); resumable checkpoints.


rule train:
    input:
        train=expand(out("{sample}/augment.zarr"), sample=TRAIN),
        val_stacks=expand(out("{sample}/stack.ome.zarr"), sample=VAL),
        val_weights=expand(out("{sample}/weights.zarr"), sample=VAL),
    output:
        model=out("model/model.pt"),
        curve=report(out("model/curve.png"), caption="../report/curve.rst", category="Training"),
        metrics=out("model/metrics.csv"),
        card=out("model/model_card.json"),
    params:
        out_dir=lambda wc, output: q(os.path.dirname(output.model)),
        val=lambda wc, input: val_option(input.val_stacks, input.val_weights),
        options=lambda wc: train_options(),
        export=lambda wc: f"--export-weights {config['train']['export_weights']}",
        model=model_args(),
        threads=lookup(dpath="train/threads", within=config),
        code=code_hash("train"),
    conda:
        "../../environment.yml"
    log:
        out("logs/train.log"),
    benchmark:
        out("logs/benchmark/train.tsv")
    # compute threads come from the config, not from --cores: float results depend on the
    # thread count, and the same config must give the same model on any machine
    threads: lookup(dpath="train/threads", within=config)
    resources:
        mem_mb=8000,
        runtime=lookup(dpath="train/runtime_min", within=config),
    shell:
        "unet train --train {input.train:q} {params.val} --out-dir {params.out_dir}"
        " {params.model} {params.options} {params.export} --resume --restart-if-changed --threads {params.threads} > {log:q} 2>&1"
