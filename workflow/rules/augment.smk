# Stage 3: stored, seeded, elastically deformed training sets.


rule augment:
    input:
        stack=out("{sample}/stack.ome.zarr"),
        weights=out("{sample}/weights.zarr"),
    output:
        samples=directory(out("{sample}/augment.zarr")),
        plot=report(
            out("{sample}/augment.png"),
            caption="../report/augment.rst",
            category="Augmentation",
            labels={"sample": "{sample}"},
        ),
    params:
        k=lookup(dpath="augment/samples_per_slice", within=config),
        tile_out=lookup(dpath="train/tile_out", within=config),
        grid=lookup(dpath="augment/grid", within=config),
        sigma_px=lookup(dpath="augment/sigma_px", within=config),
        brightness=lookup(dpath="augment/brightness", within=config),
        contrast=lookup(dpath="augment/contrast", within=config),
        gamma=lookup(dpath="augment/gamma", within=config),
        seed=lookup(dpath="augment/seed", within=config),
        device=lookup(dpath="augment/device", within=config),
        normalisation=lookup(dpath="normalisation", within=config),
        volume=optional_flags("train", {"tile_out_z": "--tile-out-z"}) + optional_flags("augment", {"sigma_um": "--sigma-um"}),
        model=model_args(),
        code=code_hash("augment"),
    conda:
        "../../environment.yml"
    log:
        out("logs/augment/{sample}.log"),
    benchmark:
        out("logs/benchmark/augment/{sample}.tsv")
    threads: 2
    resources:
        mem_mb=4000,
    shell:
        "unet augment {input.stack:q} {input.weights:q} {output.samples:q}"
        " --samples-per-slice {params.k} --tile-out {params.tile_out} --grid {params.grid}"
        " --sigma-px {params.sigma_px} --brightness {params.brightness} --contrast {params.contrast}"
        " --gamma {params.gamma} --seed {params.seed} {params.model}{params.volume}"
        " --device {params.device} --normalisation {params.normalisation} --plot {output.plot:q} --threads {threads} > {log:q} 2>&1"
