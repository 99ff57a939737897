rule unpack:
    input:
        "data/{dataset}.zip",
    output:
        directory("data/{dataset}"),
    params:
        configfiles=CONFIGFILES,
        settings=config["unpack"],
    log:
        "logs/unpack/{dataset}.log",
    threads: 1
    resources:
        mem_mb=2000,
    conda:
        ENV
    shell:
        "python -m imgembed unpack {input} -o {output} --configfile {params.configfiles} --log {log}"
