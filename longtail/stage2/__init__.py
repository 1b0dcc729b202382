"""stage2"""
