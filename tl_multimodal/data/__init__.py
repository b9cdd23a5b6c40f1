"""Images and captions from disk or the hub: the COCO sample (images, captions, instance masks and the object
a noun names), image-caption datasets in folders, webdataset shards or hub streams, and demo photos.

May import: the private top-level helpers; nothing else of the package.
"""
