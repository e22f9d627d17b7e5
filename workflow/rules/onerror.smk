"""After a failed run: the summary and the report over what finished (the Snakefile's onerror)."""


def failed_cells(job):
    """The cells (eval or serving JSONs) among ``job``'s inputs that a failed run left missing, each
    with the step that failed on its way (None if none did: the run was stopped) and its log."""
    dag, failed = workflow.dag, workflow.scheduler.failed
    cells = []
    for dep, files in dag.dependencies[job].items():
        if all(os.path.exists(f) for f in files):
            continue
        culprit = next((j for j in dag.bfs(dag.dependencies, dep) if j in failed), None)
        wc = dep.wildcards_dict
        cells.append({
            "model": wc["model"], "variant": wc["variant"], "bench": wc.get("bench", "serving"),
            "metric": config["benches"][wc["bench"]]["metric"] if "bench" in wc else None,
            "step": culprit.rule.name if culprit else None,
            "log": str(culprit.log[0]) if culprit and culprit.log else None,
        })
    return sorted(cells, key=lambda c: (c["model"], c["bench"], c["variant"]))


def summarize_what_exists():
    """After a failed run (onerror): the summary, and the report's figures where this run asked for
    them, over what exists, every missing cell FAILED with its step's error. Both are marked
    incomplete, as a killed job's outputs are, so the next run rebuilds them."""
    jobs = {job.rule.name: job for job in workflow.dag.jobs if job.rule.name in ("summary", "plots")}
    cells = failed_cells(jobs["summary"]) if "summary" in jobs else []
    if not cells:
        return  # no summary asked for, or what failed came after it
    for job in jobs.values():
        workflow.persistence.started(job)
    summary, failed = jobs["summary"], json.dumps(cells)
    evals = [f for f in eval_targets() if os.path.exists(f)]
    serving = [f for f in serving_targets() if os.path.exists(f)]
    try:
        shell(
            "SNAKETUNE_JOB={summary.params.job:q} python -m snaketune.summary --evals {evals} --serving {serving}"
            " --failed {failed:q} --out-json {summary.output.json} --out-md {summary.output.md} > {summary.log} 2>&1"
        )
        if "plots" in jobs:
            plots, train = jobs["plots"], [f for f in TRAIN_OUTPUTS if os.path.exists(f)]
            shell(
                "SNAKETUNE_JOB={plots.params.job:q} python -m snaketune.report --summary {summary.output.json}"
                " --summary-md {summary.output.md} --train {train} --serving {serving}"
                " --out {plots.params.out} > {plots.log} 2>&1"
            )
    except subprocess.CalledProcessError:
        print(f"The summary of what finished failed too: its log ({summary.log}, or plots.log beside it) says why")
        return
    print(f"\nSummary of what finished ({len(cells)} cell(s) FAILED):\n")
    print(Path(summary.output.md).read_text())
