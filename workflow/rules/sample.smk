rule sample:
    output:
        "data/sample.zip",
    params:
        configfiles=CONFIGFILES,
        settings=config["sample"],
    log:
        "logs/sample.log",
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        ENV
    shell:
        "python -m imgembed sample -o {output} --configfile {params.configfiles} --log {log}"
