"""What a finished run becomes: the export formats, a sweep's adapter bundle. May import storage, runtime, data,
methods, model.
"""
