"""The fusion core both model families use: the maths (pure torch), member checks, member placement."""
