rule evaluate:
    input:
        embeddings="embeddings/{dataset}/test.npz",
        baseline="reports/{dataset}/baseline.json",
    output:
        metrics="reports/{dataset}/metrics.json",
        per_class="reports/{dataset}/per_class.json",
        comparison="reports/{dataset}/baseline_comparison.json",
    params:
        configfiles=CONFIGFILES,
        report_dir=lambda wildcards, output: Path(output.metrics).parent,
        settings=config["evaluate"],
    log:
        "logs/evaluate/{dataset}.log",
    threads: all_cores()
    resources:
        mem_mb=4000,
    conda:
        ENV
    shell:
        "python -m imgembed evaluate {input.embeddings} --baseline {input.baseline} -o {params.report_dir} "
        "--configfile {params.configfiles} --log {log}"
