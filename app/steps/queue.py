"""The queue, in step 4 under Start training: the jobs waiting behind the running one, in order, each with the
`launch.py` command it will run; a waiting job can be taken out. The queue itself is app/jobqueue.py."""

from __future__ import annotations

from functools import partial

import gradio as gr

from ..manager import Values, say
from ..studio import ordinal
from . import Context

IDS = ["queue.table", "queue.pick"]
EMPTY = ("**Queue:** no jobs are waiting. *Add to queue* lines a run up behind the running job; new previews asked "
         "for while a job runs wait here too.")


def key(studio) -> list[str]:
    """What the queue holds now, to tell whether the page must draw it again."""
    return [job.id for job in studio.queue.jobs()]


def view(studio, pick: str | None = None) -> Values:
    """The waiting jobs as a table and as the menu of the one to remove. `pick` is the menu's value when the event
    began: it is kept while it still waits (a redraw that lands after the person picked must not undo it)."""
    jobs = studio.queue.jobs()
    if not jobs:
        return {"queue.table": EMPTY, "queue.pick": gr.Dropdown(choices=[], value=None)}
    lines = ["**Queue:** one job runs at a time; these wait, first in line first.", "",
             "| | job | command |", "|---|---|---|"]
    lines += [f"| {ordinal(i)} | {job.name} | `{job.command}` |" for i, job in enumerate(jobs, 1)]
    choices = [(f"{ordinal(i)}: {job.name}", job.id) for i, job in enumerate(jobs, 1)]
    ids = [job.id for job in jobs]
    menu = gr.Dropdown(choices=choices) if pick in ids else gr.Dropdown(choices=choices, value=ids[0])
    return {"queue.table": "\n".join(lines), "queue.pick": menu}


def remove(studio, v: Values) -> Values:
    """Take the picked job out of the queue; its run folder stays as it is."""
    if not v["queue.pick"]:
        raise ValueError("no job is waiting in the queue")
    job = studio.queue.remove(v["queue.pick"])
    what = "its run stays unfinished: Resume under Past runs starts it" if job.kind == "run" else \
        "no previews are made"
    return {**view(studio), "queue.msg": say(f"Removed {job.name} from the queue; {what}.")}


def build(ctx: Context) -> dict:
    """Inside step 4: the queue's table, the menu of waiting jobs and Remove."""
    studio, m = ctx.studio, ctx.manager
    shown = view(studio)
    table = gr.Markdown(shown["queue.table"], elem_id="queue")
    with gr.Row():
        pick = gr.Dropdown(shown["queue.pick"].constructor_args.get("choices", []),
                           value=shown["queue.pick"].constructor_args.get("value"), label="Waiting job", scale=3,
                           elem_id="queue-pick")
        remove_button = gr.Button("Remove from queue", size="sm", scale=1, elem_id="queue-remove")
    msg = gr.Markdown(elem_id="msg-queue", elem_classes="emloc-msg")  # under the button it answers
    elems = {"table": table, "pick": pick, "remove": remove_button, "msg": msg}
    m.add("queue", elems)
    m.bind(remove_button.click, partial(remove, studio), ["queue.pick"], [*IDS, "queue.msg"], message="queue.msg")
    return elems
