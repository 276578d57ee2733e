"""Artifacts: models loaded from what a run left, merged Hugging Face and CTranslate2 exports."""
