# The run's numbers as pictures for `snakemake --report`: training curves, "did training help?",
# per-class precision and the test metrics table. Reads only what earlier stages wrote.
rule charts:
    input:
        live="reports/{dataset}/train",
        info="models/{dataset}/model.json",
        metrics="reports/{dataset}/metrics.json",
        per_class="reports/{dataset}/per_class.json",
        comparison="reports/{dataset}/baseline_comparison.json",
    output:
        metrics_table=report("reports/{dataset}/plots/metrics.html", caption="../report/metrics.rst",
                             category="{dataset}", subcategory="1 results", labels={"figure": "test metrics"}),
        comparison=report("reports/{dataset}/plots/comparison.png", caption="../report/comparison.rst",
                          category="{dataset}", subcategory="1 results", labels={"figure": "did training help?"}),
        per_class=report("reports/{dataset}/plots/per_class.png", caption="../report/per_class.rst",
                         category="{dataset}", subcategory="1 results", labels={"figure": "per-class P@1"}),
        training=report("reports/{dataset}/plots/training.png", caption="../report/training.rst",
                        category="{dataset}", subcategory="2 training", labels={"figure": "training curves"}),
    params:
        reports=lambda wildcards, input: Path(input.metrics).parent,
        plots_dir="reports/{dataset}/plots",
    log:
        "logs/charts/{dataset}.log",
    threads: 1
    resources:
        mem_mb=2000,
    conda:
        ENV
    shell:
        "python -m imgembed charts {params.reports} --live-dir {input.live} --model-info {input.info} "
        "-o {params.plots_dir} --log {log}"
