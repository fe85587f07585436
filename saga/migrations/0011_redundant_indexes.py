import django.db.models.deletion
from django.db import migrations, models

from common.indexes import DropLikeIndexes


class Migration(migrations.Migration):
    """Indexes no query needs (common.indexes): the step's own index on its saga (the unique
    (saga, name) starts with it) and the trace id's LIKE twin. The trace id's index stays,
    renamed: it is kept, not built again."""

    dependencies = [("saga", "0010_step_not_needed")]

    operations = [
        migrations.AlterField(
            model_name="sagastep",
            name="saga",
            field=models.ForeignKey(
                db_index=False,
                on_delete=django.db.models.deletion.CASCADE,
                related_name="steps",
                to="saga.sagainstance",
            ),
        ),
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AlterField(
                    model_name="sagainstance",
                    name="trace_id",
                    field=models.CharField(blank=True, max_length=32),
                ),
                migrations.AddIndex(
                    model_name="sagainstance",
                    index=models.Index(fields=["trace_id"], name="saga_trace_id_idx"),
                ),
            ],
            database_operations=[
                DropLikeIndexes(
                    "saga",
                    [("sagainstance", "trace_id")],
                    keep_plain_as={("sagainstance", "trace_id"): "saga_trace_id_idx"},
                ),
            ],
        ),
    ]
