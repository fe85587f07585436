from django.db import migrations, models


class Migration(migrations.Migration):
    """The order's own index on its user: order_user_created_idx starts with it (common.indexes)."""

    dependencies = [("orders", "0002_step_abort")]

    operations = [
        migrations.AlterField(model_name="order", name="user_id", field=models.BigIntegerField()),
    ]
