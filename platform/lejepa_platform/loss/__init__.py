"""LeJEPA objective: SIGReg (sketched Epps-Pulley) and the prediction term. Pure torch."""
