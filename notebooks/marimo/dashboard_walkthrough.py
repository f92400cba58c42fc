import marimo

__generated_with = "0.25.2"
app = marimo.App(width="full")


@app.cell
def _():
    import marimo as mo

    return (mo,)


@app.cell(hide_code=True)
def _(mo):
    mo.md(r"""
    # Fine-tune with the LoRA dashboard, in marimo

    The walkthrough of notebook 02 as a marimo app, on the model shipped with `lora_widgets` (1.9 M parameters,
    pretrained on Python source code), adapted with LoRA to the prose of Python's own documentation. Everything runs
    offline: the model, the tokenizer and the text come with the package and your Python installation.

    - **Train**, **Pause** and **Stop** act while other cells run: the run is a task on marimo's event loop, and each
      training step runs in a worker thread.
    - The dashboard is one anywidget: its charts are drawn as SVG by the package's own front end (bqplot, which the
      Jupyter version uses, does not render in marimo).
    - The cells under it are reactive: the one that reads the run's outcome runs again when the run ends.
    """)
    return


@app.cell(hide_code=True)
def _(mo):
    device_choice = mo.ui.dropdown(
        options={"automatic (a GPU if there is one)": "auto", "CPU": "cpu", "GPU (CUDA)": "cuda"},
        value="automatic (a GPU if there is one)",
        label="Train on",
    )
    device_choice
    return (device_choice,)


@app.cell
def _(device_choice, mo):
    import torch

    from lora_widgets import describe_device, list_devices, select_device

    wanted = device_choice.value
    mo.stop(
        wanted == "cuda" and not torch.cuda.is_available(),
        mo.callout(
            mo.md(
                "**No GPU found.** You asked for a CUDA GPU and this Python sees none "
                f"(found: {', '.join(str(d) for d in list_devices())}).\n\n"
                "- In Colab or a cloud notebook: pick a GPU runtime, then restart.\n"
                "- On your machine: check `nvidia-smi`, and that `torch.version.cuda` is not `None` "
                f"(it is `{torch.version.cuda}` here).\n"
                "- Or choose **CPU** above: the shipped model trains on a CPU in a minute."
            ),
            kind="danger",
        ),
    )
    device = select_device(wanted)
    mo.md(f"Training on **{describe_device(device)}**.")
    return (device,)


@app.cell
def _(device, mo):
    from lora_widgets import load_base_model, load_corpus, prepare_data

    model, tokenizer = load_base_model(device=device)
    texts = load_corpus("finetune")
    data = prepare_data(texts, tokenizer, block_size=128, val_fraction=0.1, seed=0)
    mo.md(
        f"{len(texts)} documents of the Python Language Reference: **{len(data.train)}** training and "
        f"**{len(data.val)}** validation blocks of 128 tokens."
    )
    return data, model, tokenizer


@app.cell(hide_code=True)
def _(mo):
    mo.md(r"""
    ## The dashboard

    Click **Train**. The loss chart draws the training loss (light), its smoothed curve (dark) and the validation
    loss (red dots); beside it the learning-rate schedule with the current step, the process memory and tokens per
    second; below, once the adapters have moved, a heatmap of $\|\Delta W\| / \|W\|$ per layer and module (click a
    cell for that adapter's singular values). `board = dash.ui` makes the dashboard a marimo UI element, so cells can
    read its value.
    """)
    return


@app.cell
def _(data, device, mo, model, tokenizer):
    from lora_widgets import LoRAConfig, LoRADashboard, TrainConfig

    runs_root = mo.notebook_dir() / "runs"
    dash = LoRADashboard(
        model=model,
        tokenizer=tokenizer,
        train_data=data.train,
        eval_data=data.val,
        lora=LoRAConfig(r=8, alpha=16.0, target_modules="all-linear"),
        train=TrainConfig(learning_rate=3e-3, schedule="cosine", warmup_steps=10, batch_size=8, max_steps=200,
                          eval_every=40, seed=0, device=str(device), output_dir=str(runs_root)),
    )  # fmt: skip
    board = dash.ui
    board
    return board, dash


@app.cell(hide_code=True)
def _(mo):
    mo.md(r"""
    ## A cell to run while it trains

    The dashboard's run does not hold the notebook: move the slider while the loss chart advances; this cell answers
    at once.
    """)
    return


@app.cell
def _(mo):
    rank_probe = mo.ui.slider(1, 64, value=8, label="a LoRA rank r", show_value=True)
    rank_probe
    return (rank_probe,)


@app.cell
def _(mo, model, rank_probe):
    adapted = [m for n, m in model.named_modules() if n.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))]
    per_rank = sum(m.in_features + m.out_features for m in adapted if hasattr(m, "in_features"))
    mo.md(
        f"<span id='lw-probe'>r = {rank_probe.value}: LoRA on the attention projections would train "
        f"**{rank_probe.value * per_rank:,}** numbers (r(d+k) per layer).</span>"
    )
    return


@app.cell(hide_code=True)
def _(mo):
    mo.md(r"""
    ## After the run

    This cell reads `board.value["run_state"]`: it runs again whenever the run changes state, and stops (with a
    note) until the run has ended. Then it has the adapter's path, in PEFT's format.
    """)
    return


@app.cell
def _(board, dash, mo):
    import json
    from pathlib import Path

    run_state = board.value["run_state"]
    mo.stop(
        not run_state.get("ended"),
        mo.callout(
            mo.md(f"Waiting for a run to end (now: **{run_state.get('state', 'idle')}**)."), kind="neutral"
        ),
    )
    adapter = Path(run_state["adapter_path"])
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    mo.vstack(
        [
            mo.callout(
                mo.md(
                    f"**{run_state['run']}** {run_state['state']} at step {run_state['step']}; the adapter is in "
                    f"`{adapter}` (r = {adapter_config['r']}, "
                    f"{(adapter / 'adapter_model.safetensors').stat().st_size:,} bytes)."
                ),
                kind="success" if run_state["state"] == "finished" else "warn",
            ),
            mo.Html(dash.static_summary_html()),
        ]
    )
    return


@app.cell(hide_code=True)
def _(mo):
    mo.md(r"""
    ## Will a bigger model fit? The memory planner

    `MemoryPlanner` estimates the memory of a fine-tune before you start it: pick a model, a method (full, LoRA,
    QLoRA), the rank, batch, sequence length and precision; it shows the parts (weights, gradients, optimizer state,
    activations) and which GPUs it fits.
    """)
    return


@app.cell
def _():
    from lora_widgets import MemoryPlanner

    planner = MemoryPlanner("SmolLM2-135M", batch_size=8, seq_len=512)
    planner
    return


if __name__ == "__main__":
    app.run()
