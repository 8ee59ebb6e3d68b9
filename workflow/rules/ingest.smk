# Stage 1: raw TIFF stacks -> chunked OME-Zarr (one store per sample row).


rule ingest:
    input:
        unpack(get_ingest_inputs),
    output:
        directory(out("{sample}/stack.ome.zarr")),
    params:
        labels=get_labels_option,
        slices=lambda wc: q(samples[wc.sample]["slices"] or "all"),
        voxel=lambda wc: voxel_option(samples[wc.sample]),
        chunks=",".join(map(str, config["ingest"]["chunks"])),
        code=code_hash("ingest"),
    conda:
        "../../environment.yml"
    log:
        out("logs/ingest/{sample}.log"),
    benchmark:
        out("logs/benchmark/ingest/{sample}.tsv")
    resources:
        mem_mb=2000,
    shell:
        "unet ingest {input.image:q} {output:q} {params.labels} --slices {params.slices}"
        " --chunks {params.chunks}{params.voxel} --name {wildcards.sample} > {log:q} 2>&1"
