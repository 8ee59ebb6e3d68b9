# The embedded default dataset: realistic synthetic microscopy stacks (no downloads).


rule synth:
    output:
        image="resources/synth/image.tif",
        labels="resources/synth/labels.tif",
    params:
        slices=lookup(dpath="synth/slices", within=config),
        size=lookup(dpath="synth/size_px", within=config),
        seed=lookup(dpath="synth/seed", within=config),
        density=lookup(dpath="synth/density", within=config),
        gap=lookup(dpath="synth/gap_px", within=config),
        code=code_hash("synth"),
    conda:
        "../../environment.yml"
    log:
        out("logs/synth.log"),
    benchmark:
        out("logs/benchmark/synth.tsv")
    shell:
        "unet synth --image {output.image:q} --labels {output.labels:q} --slices {params.slices}"
        " --size {params.size} --seed {params.seed} --density {params.density} --gap-px {params.gap}"
        " > {log:q} 2>&1"
