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


def listing(studio) -> tuple[str, list[tuple[str, str]]]:
    """(the waiting jobs as a markdown table, the menu's (label, job id) choices), first in line first."""
    jobs = studio.queue.jobs()
    if not jobs:
        return EMPTY, []
    lines = ["**Queue:** one job runs at a time; these wait, first in line first.", "",
             "| | job | command |", "|---|---|---|"]
    lines += [f"| {ordinal(i)} | {job.name} | `{job.command}` |" for i, job in enumerate(jobs, 1)]
    return "\n".join(lines), [(f"{ordinal(i)}: {job.name}", job.id) for i, job in enumerate(jobs, 1)]


def view(studio, pick: str | None = None) -> Values:
    """The queue's table and the menu of the job to remove. `pick` is the menu's value when the event began: it
    is kept while it still waits (a redraw that lands after the person picked must not undo it)."""
    table, choices = listing(studio)
    ids = [job_id for _, job_id in choices]
    menu = gr.Dropdown(choices=choices) if pick in ids else \
        gr.Dropdown(choices=choices, value=ids[0] if ids else None)
    return {"queue.table": table, "queue.pick": menu}


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
    text, choices = listing(studio)  # (not view: a component made here would join the page)
    table = gr.Markdown(text, elem_id="queue")
    with gr.Row():
        pick = gr.Dropdown(choices, value=choices[0][1] if choices else None, label="Waiting job", scale=3,
                           elem_id="queue-pick", allow_custom_value=True)  # a job that started meanwhile: said
        # in words by Remove, not refused by gradio's check of the choices (the timer reads this menu every second
        # and the queue can change between its reading and the server's check)
        remove_button = gr.Button("Remove from queue", size="sm", scale=1, elem_id="queue-remove")
    msg = gr.Markdown(elem_id="msg-queue", elem_classes="emloc-msg")  # under the button it answers
    elems = {"table": table, "pick": pick, "remove": remove_button, "msg": msg}
    m.add("queue", elems)
    m.bind(remove_button.click, partial(remove, studio), ["queue.pick"], [*IDS, "queue.msg"], message="queue.msg")
    return elems
