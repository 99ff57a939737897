# accelerate picks the device(s) and process count from config/accelerate/<train.accelerate>.yaml.
# `gpu` is a resource for cluster executors (training_gpus in common.smk); locally it limits nothing
# without --resources gpu=N.
rule train:
    input:
        "data/{dataset}",
    output:
        net="models/{dataset}/embedding_net.pt",
        info="models/{dataset}/model.json",
        # DVCLive's folder; its params.yaml (the merged config of the run) goes into the report.
        live=report(directory("reports/{dataset}/train"), patterns=["{name}.yaml"], caption="../report/config.rst",
                    category="{dataset}", subcategory="4 config", labels={"figure": "config of the run"}),
    params:
        configfiles=CONFIGFILES,
        model_dir="models/{dataset}",
        settings={k: config[k] for k in ("model", "data", "train", "evaluate")},
        accelerate=f"config/accelerate/{config['train']['accelerate']}.yaml",
    log:
        "logs/train/{dataset}.log",
    threads: all_cores()
    resources:
        gpu=training_gpus(f"config/accelerate/{config['train']['accelerate']}.yaml"),
        mem_mb=16000,
        runtime=24 * 60,
    conda:
        ENV
    shell:
        "accelerate launch --quiet --config_file {params.accelerate} -m imgembed train {input} -o {params.model_dir} "
        "--live-dir {output.live} --configfile {params.configfiles} --log {log}"
