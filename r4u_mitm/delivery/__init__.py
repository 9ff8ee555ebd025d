"""The delivery process (`r4u-mitm deliver`): spool → R4U records → POST, and the policy for
what R4U's answers mean. Knows nothing of mitmproxy flows."""
