# Stage 5: chunk-parallel overlap-tile prediction (the scatter over jobs); workflow/rules/merge.smk gathers.


rule predict:
    input:
        stack=out("{sample}/stack.ome.zarr"),
        model=MODEL,
    output:
        # the job's part store is resumable block by block, so Snakemake tracks only the
        # marker written last: a killed job's finished blocks survive and are not redone
        out("{sample}/predict/part-{job}.zarr/COMPLETE"),
    params:
        part=lambda wc, output: os.path.dirname(output[0]),
        jobs=lookup(dpath="predict/jobs", within=config),
        tile_out=lookup(dpath="predict/tile_out", within=config),
        block=lookup(dpath="predict/block_px", within=config),
        volume=optional_flags("predict", {"block_z": "--block-z", "tile_z": "--tile-z"}),
        batch=lambda wc: predict_batch_option(),
        device=lookup(dpath="predict/device", within=config),
        precision=lookup(dpath="predict/precision", within=config),
        tta=lookup(dpath="predict/tta", within=config),
        compile=lambda wc: "--compile" if config["predict"]["compile"] else "",
        decision=lookup(dpath="predict/decision", within=config),
        probabilities=lookup(dpath="predict/probabilities", within=config),
        backend=lookup(dpath="predict/backend", within=config),
        package=predict_package_options(),
        normalisation=predict_normalisation(),
        model=model_args(),
        model_sha256=lambda wc: model_file_sha256(),  # not in the command: a part of another model is redone
        threads=lookup(dpath="predict/threads", within=config),
        code=code_hash("predict"),
    conda:
        "../../environment.yml"
    log:
        out("logs/predict/{sample}-{job}.log"),
    benchmark:
        out("logs/benchmark/predict/{sample}-{job}.tsv")
    # as for training: the compute thread count is a config value (probabilities differ in
    # the last float bits between thread counts); parallelism comes from predict.jobs
    threads: lookup(dpath="predict/threads", within=config)
    resources:
        mem_mb=4000,
    shell:
        "unet predict {input.stack:q} {input.model:q} {params.part:q} --job {wildcards.job}"
        " --jobs {params.jobs} --tile-out {params.tile_out} --block-px {params.block}{params.volume}"
        " {params.batch} --device {params.device} --precision {params.precision}"
        " --tta {params.tta} {params.compile} {params.model}"
        " --decision {params.decision} --probabilities {params.probabilities} {params.normalisation}"
        " --backend {params.backend} {params.package}"
        " --threads {params.threads} > {log:q} 2>&1"
