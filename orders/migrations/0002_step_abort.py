from django.db import migrations

from common.sql import STEP_ABORT_FUNCTION


class Migration(migrations.Migration):
    dependencies = [("orders", "0001_initial")]

    operations = [STEP_ABORT_FUNCTION]
