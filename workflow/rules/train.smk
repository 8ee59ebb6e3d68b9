# Stage 4: train the U-Net (CUDA when present, CPU otherwise); resumable checkpoints.


rule train:
    input:
        train=expand("results/{sample}/augment.zarr", sample=TRAIN),
        val_stacks=expand("results/{sample}/stack.ome.zarr", sample=VAL),
        val_weights=expand("results/{sample}/weights.zarr", sample=VAL),
    output:
        model="results/model/model.pt",
        curve=report("results/model/curve.png", caption="../report/curve.rst", category="Training"),
        metrics="results/model/metrics.csv",
        card="results/model/model_card.json",
    params:
        out_dir=lambda wc, output: q(os.path.dirname(output.model)),
        val=lambda wc, input: val_option(input.val_stacks, input.val_weights),
        options=lambda wc: train_options(),
        model=model_args(),
        code=code_hash("train"),
    conda:
        "../../environment.yml"
    log:
        "logs/train.log",
    benchmark:
        "logs/benchmark/train.tsv"
    threads: workflow.cores
    resources:
        mem_mb=8000,
        runtime=lookup(dpath="train/runtime_min", within=config),
    shell:
        "unet train --train {input.train:q} {params.val} --out-dir {params.out_dir}"
        " {params.model} {params.options} --resume --threads {threads} > {log:q} 2>&1"
