from django.db import migrations

from common.indexes import LIKE, DropRedundantIndexes


class Migration(migrations.Migration):
    """The token digest's LIKE twin: a token is looked up only by its digest (common.indexes)."""

    dependencies = [("common", "0001_api_token")]

    operations = [DropRedundantIndexes("common", [("apitoken", "digest", LIKE)])]
