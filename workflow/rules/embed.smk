rule embed:
    input:
        data="data/{dataset}",
        net="models/{dataset}/embedding_net.pt",
        info="models/{dataset}/model.json",
    output:
        "embeddings/{dataset}/test.npz",
    params:
        configfiles=CONFIGFILES,
        model_dir=lambda wildcards, input: Path(input.net).parent,
        settings={k: config[k] for k in ("embed", "data")},
    log:
        "logs/embed/{dataset}.log",
    threads: all_cores()
    resources:
        mem_mb=8000,
    conda:
        ENV
    shell:
        "python -m imgembed embed {input.data} --model {params.model_dir} -o {output} "
        "--configfile {params.configfiles} --log {log}"
