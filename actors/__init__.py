"""Ray actor classes: each owns a model and calls the library (ray_pipeline/)."""


def pipeline_actors() -> tuple[type, type]:
    """The generator and scorer classes, imported when a job needs them: the scorer's module loads torch."""
    from actors.generator import GeneratorActor
    from actors.scorer import ScorerActor

    return GeneratorActor, ScorerActor
