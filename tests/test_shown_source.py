"""How a disk's source is shown and stored for reading: no credential of a URL in it."""

from __future__ import annotations

import pytest

from worker.core.model import shown_source

DATASTORE = "https://esxi01/folder/vm/disk.vmdk?dcPath=ha-datacenter&dsName=datastore1"


@pytest.mark.parametrize(
    ("source", "shown"),
    [
        ("/exports/vm/disk.vmdk", "/exports/vm/disk.vmdk"),
        ("disk?sig=not-a-url.vmdk", "disk?sig=not-a-url.vmdk"),
        (DATASTORE, DATASTORE),
        (
            "https://s3.example/b/disk.vmdk?X-Amz-Credential=AKIA%2F20261208&X-Amz-Signature=ab12",
            "https://s3.example/b/disk.vmdk?X-Amz-Credential=***&X-Amz-Signature=***",
        ),
        (
            "https://swift.example/v1/AUTH_p/c/disk.vmdk?temp_url_sig=ab12&temp_url_expires=99",
            "https://swift.example/v1/AUTH_p/c/disk.vmdk?temp_url_sig=***&temp_url_expires=***",
        ),
        ("https://root:secret@esxi01/folder/d.vmdk#part", "https://esxi01/folder/d.vmdk"),
        ("HTTP://web.example/d.vmdk?a=1&dspath=x", "http://web.example/d.vmdk?a=***&dspath=***"),
    ],
    ids=["file", "file-with-query-like-name", "datastore", "s3", "swift", "userinfo", "other"],
)
def test_a_source_is_shown_with_every_query_value_but_a_datastores_masked(
    source: str, shown: str
) -> None:
    assert shown_source(source) == shown
