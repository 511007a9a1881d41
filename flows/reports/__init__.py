"""Each flow's report, rendered from its typed state (`flows/state.py`): the text `evolforge run`
prints after a flow (`render_summary`, `rewards_summary`, `render_training_summary`,
`render_evaluation_summary`, `factory_summary`) and the Prefect artifacts a flow publishes (the
`publish_*` tasks). They sit above the stages: they read what a flow's stages wrote, by the
versions its state names, and decide nothing about what is written.
"""
