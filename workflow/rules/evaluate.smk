# Stage 6: scores against ground truth (pixel error, IoU, Dice, Rand, object F1) + overlays.


rule evaluate:
    input:
        prediction=out("{sample}/prediction.ome.zarr"),
        stack=out("{sample}/stack.ome.zarr"),
    output:
        csv=report(
            out("{sample}/evaluate/metrics.csv"),
            caption="../report/metrics.rst",
            category="Evaluation",
            labels={"sample": "{sample}", "what": "metrics table"},
        ),
        json=out("{sample}/evaluate/metrics.json"),
        overlays=report(
            out("{sample}/evaluate/overlays.png"),
            caption="../report/overlays.rst",
            category="Evaluation",
            labels={"sample": "{sample}", "what": "overlays"},
        ),
    params:
        out_dir=lambda wc, output: q(os.path.dirname(output.csv)),
        link=" --dims 3 --link-slices" if config["evaluate"]["link_slices"] else "",
        code=code_hash("evaluate"),
    conda:
        "../../environment.yml"
    log:
        out("logs/evaluate/{sample}.log"),
    benchmark:
        out("logs/benchmark/evaluate/{sample}.tsv")
    resources:
        mem_mb=4000,
    shell:
        "unet evaluate {input.prediction:q} {input.stack:q} -o {params.out_dir}{params.link} > {log:q} 2>&1"
