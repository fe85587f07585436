from django.db import migrations, models


class Migration(migrations.Migration):
    """Issue 11: a timeline row says what happened. `unknown`: the saga compensated while its
    chain may have been at this step and no report has settled it yet; `refused`: the step
    did nothing because the saga was compensating."""

    dependencies = [
        ("saga", "0006_pivot_committed"),
    ]

    operations = [
        migrations.AlterField(
            model_name="sagastep",
            name="status",
            field=models.CharField(
                choices=[
                    ("pending", "Pending"),
                    ("running", "Running"),
                    ("succeeded", "Succeeded"),
                    ("failed", "Failed"),
                    ("unknown", "Unknown"),
                    ("refused", "Refused"),
                    ("cancelled", "Cancelled"),
                ],
                default="pending",
                max_length=16,
            ),
        ),
    ]
