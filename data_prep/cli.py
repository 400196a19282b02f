"""`dqrm-prep`: Criteo raw logs -> the HDF5 dataset `dqrm-train` reads."""
from __future__ import annotations

import os
import sys

import click

from .errors import PrepError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


@click.group(context_settings=CONTEXT)
@click.version_option("0.1.0", prog_name="dqrm-prep")
def cli() -> None:
    """Prepare Criteo click logs for dqrm-train.

    \b
    Example:
      dqrm-prep synth raw/train.txt --rows 1000000 --seed 0
      dqrm-prep criteo raw/train.txt data/kaggle --workers 2
      dqrm-prep verify data/kaggle
      dqrm-prep inspect data/kaggle
    """


@cli.command(context_settings=CONTEXT)
@click.argument("raw", type=click.Path(path_type=str))
@click.argument("out", type=click.Path(file_okay=False, path_type=str))
@click.option("--dataset", type=click.Choice(["auto", "kaggle", "terabyte"]), default="auto", show_default=True,
              help="Input layout; auto: a directory of day_N files is Terabyte, a file is Kaggle.")
@click.option("--max-ind-range", type=click.IntRange(1, 2**32), default=None,
              help="Take each categorical value modulo this before assigning ids (hash mode).")
@click.option("--freq-threshold", type=click.IntRange(0), default=0, show_default=True,
              help="Values seen fewer times than this in train share id 0 (0: reference, every value its id).")
@click.option("--sub-sample-rate", type=click.FloatRange(0.0, 1.0, max_open=True), default=0.0, show_default=True,
              help="Drop this share of negative rows from train (seeded; Terabyte usually 0.875).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the shuffle and the sub-sampling.")
@click.option("--shard-rows", type=click.IntRange(1), default=1_000_000, show_default=True,
              help="Rows per HDF5 shard.")
@click.option("--workers", type=click.IntRange(1), default=_default_workers, show_default="all CPUs",
              help="Worker processes on this machine (per MPI rank under mpirun).")
@click.option("--bad-lines", type=click.Choice(["error", "skip"]), default="error", show_default=True,
              help="On a malformed line: stop with an error naming file, line and field, or skip and count it.")
@click.option("--label-dtype", type=click.Choice(["uint8", "float32"]), default="uint8", show_default=True,
              help="Storage type of the label in the shards (dqrm-train reads either).")
@click.option("--overwrite", is_flag=True, help="Replace whatever dqrm-prep left in OUT (other options, unfinished run).")
@click.option("--keep-temp", is_flag=True, help="Keep OUT/.prep (spilled rows, vocabularies) after finishing.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bars on stderr.")
@click.option("--piece-bytes", type=click.IntRange(1 << 10), default=32 << 20, hidden=True,
              help="Most bytes of plain input per parallel task, about (does not change the output).")
def criteo(raw, out, dataset, max_ind_range, freq_threshold, sub_sample_rate, seed, shard_rows, workers,
           bad_lines, label_dtype, overwrite, keep_temp, progress, piece_bytes):
    """Turn Criteo raw logs RAW into the sharded dataset OUT.

    RAW is a Kaggle train.txt (or any single file), or a Terabyte directory of
    day_0 .. day_23; plain or gzip.  Same transformation as the reference DLRM:
    empty -> 0, dense log(max(x, 0) + 1), categoricals hex -> int (modulo
    --max-ind-range) -> contiguous ids per column.  Kaggle: 7 equal days, days 0-5
    train, day 6 halves test / val; Terabyte: last day halves test / val.

    Rerunning the same command resumes an interrupted run.  Run it under
    `mpirun -np K` to spread it across machines (OUT on a shared file system).

    \b
    Example:
      dqrm-prep criteo train.txt data/kaggle --workers 2
      dqrm-prep criteo /data/criteo-tb data/tb --max-ind-range 10000000 \\
          --sub-sample-rate 0.875 --shard-rows 2000000
      mpirun -np 4 dqrm-prep criteo /shared/criteo-tb /shared/tb --workers 8
    """
    from .executor import start_worker_server

    start_worker_server(workers)  # its workers' imports overlap with the next ones
    from .options import PrepOptions
    from .pipeline import run_prep

    try:
        opts = PrepOptions(dataset=dataset, max_ind_range=max_ind_range, freq_threshold=freq_threshold,
                           sub_sample_rate=sub_sample_rate, seed=seed, shard_rows=shard_rows, bad_lines=bad_lines,
                           label_dtype=label_dtype, workers=workers, progress=progress, overwrite=overwrite,
                           keep_temp=keep_temp, piece_bytes=piece_bytes)
        meta = run_prep(raw, out, opts, log=lambda m: click.echo(m, err=True))
    except PrepError as e:
        raise click.ClickException(str(e)) from None
    skipped = meta.extra.get("counts", {}).get("rows_skipped_bad", 0)
    if skipped:
        click.echo(f"warning: {skipped:,} bad lines skipped (see meta.json extra.bad_line_examples)", err=True)


@cli.command(context_settings=CONTEXT)
@click.argument("out_file", type=click.Path(dir_okay=False, path_type=str))
@click.option("--rows", type=click.IntRange(1), required=True, help="Number of lines to write.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the planted model and the rows.")
@click.option("--profile", type=click.Choice(["planted", "criteo-like"]), default="planted", show_default=True,
              help="planted: Zipf categories of fixed cardinalities (--preset); criteo-like: statistics "
                   "calibrated to real Criteo Kaggle (cardinality growth, missing and top-value shares, "
                   "dense quantiles, CTR 25.6 %, 7 days with popularity drift and new values).")
@click.option("--preset", type=click.Choice(["tiny", "small", "large"]), default=None, show_default="small",
              help="planted profile: cardinalities of the 26 categorical features (tiny: ~20-100, small: 3-5000, "
                   "large: x200).")
@click.option("--cardinalities", type=str, default=None,
              help="planted profile: 26 comma-separated cardinalities (overrides --preset).")
@click.option("--workers", type=click.IntRange(1), default=_default_workers, show_default="all CPUs",
              help="Processes drawing chunks of rows (the file does not depend on it).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr.")
def synth(out_file, rows, seed, profile, preset, cardinalities, workers, progress):
    """Write a raw Criteo-format file drawn from a planted click model.

    Beside OUT_FILE, OUT_FILE.planted.json holds the planted model's own AUC and
    log loss on the rows that become test and val under the Kaggle split: the
    best a trained model can reach.  OUT_FILE ending in .gz is gzip-compressed.

    \b
    Example:
      dqrm-prep synth raw/train.txt --rows 2000000 --seed 1
      dqrm-prep synth raw/day_0.gz --rows 100000 --preset tiny
      dqrm-prep synth raw/criteo_like.txt --rows 2000000 --profile criteo-like
    """
    from tqdm import tqdm

    from .sources import planted_path
    from .synth import parse_cardinalities, write_synth

    if profile == "criteo-like" and (preset or cardinalities):
        raise click.UsageError("--preset and --cardinalities apply to --profile planted only "
                               "(criteo-like cardinalities follow from --rows)")
    try:
        cards = parse_cardinalities(cardinalities, preset or "small")
        with tqdm(total=rows, unit="rows", unit_scale=True, desc="synth", disable=not progress, file=sys.stderr) as bar:
            info = write_synth(out_file, rows, seed, cards, progress=bar.update, profile=profile,
                               workers=workers)
    except PrepError as e:
        raise click.ClickException(str(e)) from None
    t = info["test"]
    click.echo(f"{out_file}: {rows:,} rows; planted test AUC {t.get('auc', float('nan')):.4f}, "
               f"log loss {t.get('log_loss', float('nan')):.4f} ({planted_path(out_file)})", err=True)


@cli.command(context_settings=CONTEXT)
@click.argument("out", type=click.Path(exists=True, file_okay=False, path_type=str))
def verify(out):
    """Check every shard of OUT against its meta.json; exit 1 on any mismatch.

    Checks row counts, shapes, dtypes, ids below the cardinalities, no NaN, labels 0/1,
    and every chunk's checksum (flipped bits, truncated or corrupt shards).

    \b
    Example:
      dqrm-prep verify data/kaggle && echo ok
    """
    from .verify import verify_dataset

    problems = verify_dataset(out, warn=lambda m: click.echo(f"warning: {m}", err=True))
    if problems:
        for p in problems:
            click.echo(f"error: {p}", err=True)
        raise click.ClickException(f"{out}: {len(problems)} problem(s) found")
    click.echo(f"{out}: ok")


@cli.command(context_settings=CONTEXT)
@click.argument("out", type=click.Path(exists=True, file_okay=False, path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print meta.json as it is.")
def inspect(out, as_json):
    """Print the metadata and per-split counts of the dataset OUT.

    \b
    Example:
      dqrm-prep inspect data/kaggle
    """
    import json

    from dqrm_mpi.data.schema import SchemaError, read_meta

    from .verify import describe_dataset

    try:
        if as_json:
            click.echo(json.dumps(read_meta(out).to_dict(), indent=2, sort_keys=True))
        else:
            click.echo(describe_dataset(out))
    except SchemaError as e:
        raise click.ClickException(str(e)) from None


if __name__ == "__main__":  # pragma: no cover
    cli()
