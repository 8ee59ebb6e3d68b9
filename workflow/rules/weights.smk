# Stage 2: the paper's loss weight maps w(x) = w_c(x) + w0 * exp(-(d1 + d2)^2 / (2 sigma^2)).


rule class_weights:
    input:
        expand(out("{sample}/stack.ome.zarr"), sample=TRAIN),
    output:
        out("class_weights.json"),
    params:
        connectivity=lookup(dpath="weights/connectivity", within=config),
        dims=dims_option(),
        code=code_hash("weights"),
    conda:
        "../../environment.yml"
    log:
        out("logs/weights/class_weights.log"),
    threads: 2
    shell:
        "unet class-weights {input:q} -o {output:q} --connectivity {params.connectivity}{params.dims}"
        " --threads {threads} > {log:q} 2>&1"


rule weights:
    input:
        stack=out("{sample}/stack.ome.zarr"),
        class_weights=out("class_weights.json"),
    output:
        # the PNG is written next to the store by `unet weights`
        weights=directory(out("{sample}/weights.zarr")),
        plot=report(
            out("{sample}/weights.png"),
            caption="../report/weights.rst",
            category="Weight maps",
            labels={"sample": "{sample}"},
        ),
    params:
        w0=lookup(dpath="weights/w0", within=config),
        scale=weights_scale_options(),
        tolerance=lookup(dpath="weights/tolerance", within=config),
        connectivity=lookup(dpath="weights/connectivity", within=config),
        border_pixels=lookup(dpath="weights/border_pixels", within=config),
        code=code_hash("weights"),
    conda:
        "../../environment.yml"
    log:
        out("logs/weights/{sample}.log"),
    benchmark:
        out("logs/benchmark/weights/{sample}.tsv")
    threads: 2
    resources:
        mem_mb=4000,
    shell:
        "unet weights {input.stack:q} {output.weights:q} --class-weights {input.class_weights:q}"
        " --w0 {params.w0} {params.scale} --tolerance {params.tolerance}"
        " --connectivity {params.connectivity} --border-pixels {params.border_pixels}"
        " --threads {threads} > {log:q} 2>&1"
