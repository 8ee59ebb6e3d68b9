# Stage 5b: merge the predict jobs' part stores into one OME-Zarr prediction (the gather), as
# predict.merge_jobs parallel pieces per pass over pixels; the serial rounds between them number
# the labels (unet_core/infer/merge.py). Records between rounds live in {sample}/merge/ (temporary:
# Snakemake removes them once the prediction is written; finish removes the folder).


rule merge_start:
    input:
        unpack(merge_inputs),
    output:
        temp(out("{sample}/merge/start.done")),
    params:
        args=merge_args,
        code=code_hash("merge"),
    conda:
        "../../environment.yml"
    log:
        out("logs/merge/{sample}-start.log"),
    resources:
        mem_mb=2000,
    shell:
        "unet merge {params.args} --step start > {log:q} 2>&1"


rule merge_seeds:
    input:
        stack=out("{sample}/stack.ome.zarr"),  # the parts come in through start.done: not K x jobs inputs
        start=out("{sample}/merge/start.done"),
    output:
        temp(out("{sample}/merge/seeds-{piece}.npz")),
    params:
        args=merge_args,
        code=code_hash("merge"),
    conda:
        "../../environment.yml"
    log:
        out("logs/merge/{sample}-seeds-{piece}.log"),
    benchmark:
        out("logs/benchmark/merge/{sample}-seeds-{piece}.tsv")
    resources:
        mem_mb=4000,
    shell:
        "unet merge {params.args} --step seeds --job {wildcards.piece} > {log:q} 2>&1"


rule merge_number_seeds:
    input:
        unpack(merge_inputs),
        start=out("{sample}/merge/start.done"),
        pieces=expand(out("{{sample}}/merge/seeds-{piece}.npz"), piece=MERGE_PIECES),
    output:
        temp(out("{sample}/merge/seed-ids.npz")),
    params:
        args=merge_args,
        code=code_hash("merge"),
    conda:
        "../../environment.yml"
    log:
        out("logs/merge/{sample}-number-seeds.log"),
    resources:
        mem_mb=4000,
    shell:
        "unet merge {params.args} --step number-seeds > {log:q} 2>&1"


rule merge_cells:
    input:
        stack=out("{sample}/stack.ome.zarr"),  # the parts come in through start.done: not K x jobs inputs
        start=out("{sample}/merge/start.done"),
        seeds=merge_seed_ids,
    output:
        temp(out("{sample}/merge/cells-{piece}.npz")),
    params:
        args=merge_args,
        code=code_hash("merge"),
    conda:
        "../../environment.yml"
    log:
        out("logs/merge/{sample}-cells-{piece}.log"),
    benchmark:
        out("logs/benchmark/merge/{sample}-cells-{piece}.tsv")
    resources:
        mem_mb=4000,
    shell:
        "unet merge {params.args} --step cells --job {wildcards.piece} > {log:q} 2>&1"


rule merge_number_cells:
    input:
        unpack(merge_inputs),
        start=out("{sample}/merge/start.done"),
        pieces=expand(out("{{sample}}/merge/cells-{piece}.npz"), piece=MERGE_PIECES),
    output:
        temp(out("{sample}/merge/cell-ids.npz")),
    params:
        args=merge_args,
        code=code_hash("merge"),
    conda:
        "../../environment.yml"
    log:
        out("logs/merge/{sample}-number-cells.log"),
    resources:
        mem_mb=4000,
    shell:
        "unet merge {params.args} --step number-cells > {log:q} 2>&1"


rule merge_write:
    input:
        stack=out("{sample}/stack.ome.zarr"),  # the parts come in through start.done: not K x jobs inputs
        start=out("{sample}/merge/start.done"),
        ids=out("{sample}/merge/cell-ids.npz"),
    output:
        temp(out("{sample}/merge/write-{piece}.done")),
    params:
        args=merge_args,
        code=code_hash("merge"),
    conda:
        "../../environment.yml"
    log:
        out("logs/merge/{sample}-write-{piece}.log"),
    benchmark:
        out("logs/benchmark/merge/{sample}-write-{piece}.tsv")
    resources:
        mem_mb=4000,
    shell:
        "unet merge {params.args} --step write --job {wildcards.piece} > {log:q} 2>&1"


rule merge:
    input:
        unpack(merge_inputs),
        start=out("{sample}/merge/start.done"),
        ids=out("{sample}/merge/cell-ids.npz"),
        pieces=expand(out("{{sample}}/merge/write-{piece}.done"), piece=MERGE_PIECES),
    output:
        prediction=directory(out("{sample}/prediction.ome.zarr")),
        cells=out("{sample}/cells.csv"),
        **merge_tiff_output(),
    params:
        args=merge_args,
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
        "unet merge {params.args} --step finish > {log:q} 2>&1"
