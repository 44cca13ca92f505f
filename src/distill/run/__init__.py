"""The run layer: recipe schema, the pipeline (teacher -> scratch twin -> distilled student), run
folders, reports and measurements. May import engine, teachers, losses, models, data; never cli.
"""
