"""`python -m riskexp.merge`: P-SACPO's merged policies (riskexp.stepwise.merge)."""

from riskexp.stepwise.merge import main

if __name__ == "__main__":
    main()
