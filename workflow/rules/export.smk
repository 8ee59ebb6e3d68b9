# Optional target (not in rule all): the trained model as a bioimage.io package (README "Sharing models").
#   ./run.sh export_bioimageio        or        snakemake --cores all <output_dir>/export/bioimageio.zip
# Its test tensors and cover come from the middle slice of export_sample() (rules/common.smk).


rule export_bioimageio:
    input:
        model=MODEL,
        sample=lambda wc: export_sample(),
    output:
        out("export/bioimageio.zip"),
    params:
        code=code_hash("export_bioimageio"),
    conda:
        "../../environment.yml"
    log:
        out("logs/export_bioimageio.log"),
    threads: 1
    resources:
        mem_mb=4000,
    shell:
        "unet export-bioimageio {input.model:q} {output:q} --sample {input.sample:q} > {log:q} 2>&1"
