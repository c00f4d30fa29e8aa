//! celery-scale
