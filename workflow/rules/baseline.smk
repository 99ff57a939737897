# Retrieval with no training at all: raw pixels, the backbone's pooled features before training and
# their PCA to embedding_dim (fitted on train). evaluate puts the trained model beside these
# rows, so every report shows whether training helped. It reads the training seed (a random
# backbone is then the one training starts from) and precision, but no other training setting,
# so trying a learning rate does not redo it.
rule baseline:
    input:
        "data/{dataset}",
    output:
        "reports/{dataset}/baseline.json",
    params:
        configfiles=CONFIGFILES,
        settings={
            **{k: config[k] for k in ("model", "data", "embed", "evaluate")},
            "train.seed": config["train"]["seed"],
            "train.mixed_precision": config["train"]["mixed_precision"],
        },
    log:
        "logs/baseline/{dataset}.log",
    threads: all_cores()
    resources:
        mem_mb=8000,
    conda:
        ENV
    shell:
        "python -m imgembed baseline {input} -o {output} --configfile {params.configfiles} --log {log}"
