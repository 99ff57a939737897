rule plot:
    input:
        embeddings="embeddings/{dataset}/test.npz",
        data="data/{dataset}",
    output:
        embedding=report("reports/{dataset}/plots/embedding.png", caption="../report/embedding.rst",
                         category="{dataset}", subcategory="3 embeddings", labels={"figure": "embedding map"}),
        retrievals=report("reports/{dataset}/plots/retrievals.png", caption="../report/retrievals.rst",
                          category="{dataset}", subcategory="3 embeddings", labels={"figure": "retrieval gallery"}),
    params:
        configfiles=CONFIGFILES,
        plots_dir="reports/{dataset}/plots",
        settings=config["plots"],
    log:
        "logs/plot/{dataset}.log",
    threads: 1
    resources:
        mem_mb=4000,
    conda:
        ENV
    shell:
        "python -m imgembed plot {input.embeddings} --data {input.data} -o {params.plots_dir} "
        "--configfile {params.configfiles} --log {log}"
