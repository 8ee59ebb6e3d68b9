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


# The 3-D synthetic volumes (config/synth3d.yaml): touching nuclei, z spacing 4x the in-plane one,
# written with their voxel size. A samples row naming resources/synth3d/seed<S>/volume<I>/image.tif
# gets the volume of (seed S, index I); other seeds make held-out volumes (unet synth --dims 3 --help).
rule synth_volume:
    output:
        image="resources/synth3d/seed{seed}/volume{index}/image.tif",
        labels="resources/synth3d/seed{seed}/volume{index}/labels.tif",
    wildcard_constraints:
        seed=r"\d+",
        index=r"\d+",
    params:
        code=code_hash("synth"),
    conda:
        "../../environment.yml"
    log:
        out("logs/synth3d/seed{seed}-volume{index}.log"),
    shell:
        "unet synth --dims 3 --image {output.image:q} --labels {output.labels:q}"
        " --seed {wildcards.seed} --index {wildcards.index} > {log:q} 2>&1"
