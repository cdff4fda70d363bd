"""The planner: will a run fit? A catalogue of real models described on the `meta` device (`catalogue`), every
phase's predicted peak per method and ratio (`planning`, on `emloc.memory`), and `launch.py plan` (`cli`).

May import: `emloc`, the run machine (`pipelines.runner`) and the backends' published layer names; never `demo`.
"""
