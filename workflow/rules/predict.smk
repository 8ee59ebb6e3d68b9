# Stage 5: chunk-parallel overlap-tile prediction (scatter over jobs), then merge (gather).


rule predict:
    input:
        stack="results/{sample}/stack.ome.zarr",
        model="results/model/model.pt",
    output:
        directory("results/{sample}/predict/part-{job}.zarr"),
    params:
        jobs=lookup(dpath="predict/jobs", within=config),
        tile_out=lookup(dpath="predict/tile_out", within=config),
        block=lookup(dpath="predict/block_px", within=config),
        batch=lookup(dpath="predict/batch_size", within=config),
        device=lookup(dpath="predict/device", within=config),
        tta=lookup(dpath="predict/tta", within=config),
        model=model_args(),
        code=code_hash("predict"),
    conda:
        "../../environment.yml"
    log:
        "logs/predict/{sample}-{job}.log",
    benchmark:
        "logs/benchmark/predict/{sample}-{job}.tsv"
    threads: 2
    resources:
        mem_mb=4000,
    shell:
        "unet predict {input.stack:q} {input.model:q} {output:q} --job {wildcards.job}"
        " --jobs {params.jobs} --tile-out {params.tile_out} --block-px {params.block}"
        " --batch {params.batch} --device {params.device} --tta {params.tta} {params.model}"
        " --threads {threads} > {log:q} 2>&1"


rule merge:
    input:
        stack="results/{sample}/stack.ome.zarr",
        parts=expand("results/{{sample}}/predict/part-{job}.zarr", job=JOBS),
    output:
        directory("results/{sample}/prediction.ome.zarr"),
    params:
        tiff=lambda wc: f"--tiff results/{wc.sample}/segmentation.tif" if config["predict"]["tiff"] else "",
        code=code_hash("merge"),
    conda:
        "../../environment.yml"
    log:
        "logs/merge/{sample}.log",
    benchmark:
        "logs/benchmark/merge/{sample}.tsv"
    resources:
        mem_mb=4000,
    shell:
        "unet merge {input.parts:q} --stack {input.stack:q} -o {output:q} {params.tiff} > {log:q} 2>&1"
