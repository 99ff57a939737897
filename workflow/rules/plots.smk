rule plot:
    input:
        embeddings="embeddings/{dataset}/test.npz",
        data="data/{dataset}",
    output:
        embedding="reports/{dataset}/plots/embedding.png",
        retrievals="reports/{dataset}/plots/retrievals.png",
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
