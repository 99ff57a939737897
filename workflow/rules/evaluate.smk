rule evaluate:
    input:
        "embeddings/{dataset}/test.npz",
    output:
        metrics="reports/{dataset}/metrics.json",
        per_class="reports/{dataset}/per_class.json",
    params:
        configfiles=CONFIGFILES,
        report_dir="reports/{dataset}",
        settings=config["evaluate"],
    log:
        "logs/evaluate/{dataset}.log",
    threads: workflow.cores
    resources:
        mem_mb=4000,
    conda:
        ENV
    shell:
        "python -m imgembed evaluate {input} -o {params.report_dir} --configfile {params.configfiles} --log {log}"
