"""The operator's side: the ``agent-sessions`` CLI and maintenance (backup, restore, export,
import)."""
