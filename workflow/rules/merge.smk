# Stage 5b: merge the predict jobs' part stores into one OME-Zarr prediction (the gather).


rule merge:
    input:
        stack=out("{sample}/stack.ome.zarr"),
        parts=expand(out("{{sample}}/predict/part-{job}.zarr/COMPLETE"), job=JOBS),
    output:
        prediction=directory(out("{sample}/prediction.ome.zarr")),
        cells=out("{sample}/cells.csv"),
        **merge_tiff_output(),
    params:
        parts=lambda wc, input: " ".join(q(os.path.dirname(p)) for p in input.parts),
        tiff=lambda wc, output: merge_tiff_option(output),
        instances=lookup(dpath="predict/instances", within=config),
        min_object=lookup(dpath="predict/min_object_px", within=config),
        watershed=watershed_options(),
        code=code_hash("merge"),
    conda:
        "../../environment.yml"
    log:
        out("logs/merge/{sample}.log"),
    benchmark:
        out("logs/benchmark/merge/{sample}.tsv")
    resources:
        mem_mb=4000,
    shell:
        "unet merge {params.parts} --stack {input.stack:q} -o {output.prediction:q} {params.tiff}"
        " --cells {output.cells:q} --instances {params.instances} --min-object-px {params.min_object}"
        " {params.watershed} > {log:q} 2>&1"
